// The Function App on a Flex Consumption plan (Linux, Python 3.11), run as the user-assigned identity.
// Every app setting the code reads is set here (siteConfig.appSettings) from parameters; none holds a secret: the client secret
// and the webhook key stay in Key Vault and are read at run time with the managed identity.

param planName string
param appName string
param location string
param tags object

@description('Resource id of the user-assigned managed identity the app runs as.')
param identityId string

@description('Client id of that identity: AZURE_CLIENT_ID for azure-identity, the host storage connection and App Insights.')
param identityClientId string

param blobEndpoint string
param queueEndpoint string
param tableEndpoint string
param deploymentContainerName string

param applicationInsightsConnectionString string
param workspaceId string

@description('Subnet for outbound virtual network integration; empty for none.')
param appSubnetId string = ''

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('40 per application user: docs/sizing.md.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

param dataverseUrl string
param dataverseTenantId string
param dataverseClientId string
param keyVaultUrl string
param dataverseClientSecretName string

@description('DATAVERSE_CREDENTIAL: secret, federated or certificate.')
param dataverseCredential string

@description('DATAVERSE_CERTIFICATE_NAME: Key Vault certificate for the certificate credential.')
param dataverseCertificateName string
param webhookSecretName string

@description('MESSAGE_SIGNING_SECRET_NAME: Key Vault secret the app signs queue messages with.')
param messageSigningSecretName string

@description('WEBHOOK_KEY_GRACE_SECONDS: grace period of a replaced signing key.')
param webhookKeyGraceSeconds string

@description('WEBHOOK_KEY_REFRESH_SECONDS: how often the signing keys are re-read.')
param webhookKeyRefreshSeconds string
param dataverseApiVersion string
param syncQueueName string
param reconcileSchedule string
param dataverseTimeoutSeconds string
param dataverseMaxRetries string
param dataverseMaxRetrySeconds string
param userCacheTtlSeconds string

@description('JOB_DEADLINE_SECONDS: a job stops waiting at this age; must leave one request timeout before functionTimeout.')
param jobDeadlineSeconds string

@description('HTTP_MAX_WAIT_SECONDS: the longest an HTTP trigger waits on Dataverse throttling before a 503.')
param httpMaxWaitSeconds string
param userCacheNegativeTtlSeconds string
param dataverseSharedThrottle string
param dataverseThrottleRefreshSeconds string
param dataverseThrottleGrowAfter string
param dataverseThrottleHeartbeatSeconds string

@description('AUTHORIZATION_POLICY: the authorization policy as inline JSON; empty for none (docs/authorization.md).')
param authorizationPolicy string

@description('AUTHORIZATION_POLICY_BLOB: <container>/<path> of the policy JSON in the app storage account; empty for none.')
param authorizationPolicyBlob string

@description('ALLOWED_ENTITY_SETS: entity sets jobs may write when no policy is set.')
param allowedEntitySets string

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  //checkov:skip=CKV_AZURE_225: zone redundancy on Flex Consumption needs always-ready instances (a standing cost) and is not offered in every region; enable it per deployment where required
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: appName
  location: location
  tags: union(tags, { 'azd-service-name': 'api' })
  //checkov:skip=CKV_AZURE_17: callers (servers sending webhooks) authenticate with function keys and an HMAC signature, not client certificates
  //checkov:skip=CKV_AZURE_222: the webhook endpoint must be reachable by the systems that call it; keys and signatures protect it
  kind: 'functionapp,linux'
  //checkov:skip=CKV_AZURE_212: Flex Consumption scales per function from zero; it has no minimum instance count for failover
  //checkov:skip=CKV_AZURE_213: health check evicts instances of a fixed pool; a Flex app scales from zero, so GET /api/health serves external probes
  //checkov:skip=CKV_AZURE_78: Flex Consumption has no FTP endpoint and rejects siteConfig.ftpsState (ARM error 51021), so there is nothing to disable
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    publicNetworkAccess: 'Enabled'
    virtualNetworkSubnetId: empty(appSubnetId) ? null : appSubnetId
    // Flex Consumption rejects (ARM error 51021) ftpsState, alwaysOn, linuxFxVersion, use32BitWorkerProcess,
    // netFrameworkVersion, preWarmedInstanceCount, functionAppScaleLimit and the like: it has no FTP endpoint,
    // and runtime and scale live in functionAppConfig. See "Flex Consumption plan deprecations" in the
    // Functions app settings reference.
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      remoteDebuggingEnabled: false
      http20Enabled: true
      appSettings: [
        {
          name: 'DATAVERSE_URL'
          value: dataverseUrl
        }
        {
          name: 'DATAVERSE_TENANT_ID'
          value: dataverseTenantId
        }
        {
          name: 'DATAVERSE_CLIENT_ID'
          value: dataverseClientId
        }
        {
          name: 'KEY_VAULT_URL'
          value: keyVaultUrl
        }
        {
          name: 'DATAVERSE_CLIENT_SECRET_NAME'
          value: dataverseClientSecretName
        }
        {
          name: 'DATAVERSE_CREDENTIAL'
          value: dataverseCredential
        }
        {
          name: 'DATAVERSE_CERTIFICATE_NAME'
          value: dataverseCertificateName
        }
        {
          name: 'WEBHOOK_SECRET_NAME'
          value: webhookSecretName
        }
        {
          name: 'MESSAGE_SIGNING_SECRET_NAME'
          value: messageSigningSecretName
        }
        {
          name: 'WEBHOOK_KEY_GRACE_SECONDS'
          value: webhookKeyGraceSeconds
        }
        {
          name: 'WEBHOOK_KEY_REFRESH_SECONDS'
          value: webhookKeyRefreshSeconds
        }
        {
          name: 'DATAVERSE_API_VERSION'
          value: dataverseApiVersion
        }
        {
          name: 'SYNC_QUEUE_NAME'
          value: syncQueueName
        }
        {
          name: 'RECONCILE_SCHEDULE'
          value: reconcileSchedule
        }
        {
          name: 'DATAVERSE_TIMEOUT_SECONDS'
          value: dataverseTimeoutSeconds
        }
        {
          name: 'DATAVERSE_MAX_RETRIES'
          value: dataverseMaxRetries
        }
        {
          name: 'DATAVERSE_MAX_RETRY_SECONDS'
          value: dataverseMaxRetrySeconds
        }
        {
          name: 'JOB_DEADLINE_SECONDS'
          value: jobDeadlineSeconds
        }
        {
          name: 'HTTP_MAX_WAIT_SECONDS'
          value: httpMaxWaitSeconds
        }
        {
          name: 'USER_CACHE_TTL_SECONDS'
          value: userCacheTtlSeconds
        }
        {
          name: 'USER_CACHE_NEGATIVE_TTL_SECONDS'
          value: userCacheNegativeTtlSeconds
        }
        {
          name: 'AUTHORIZATION_POLICY'
          value: authorizationPolicy
        }
        {
          name: 'AUTHORIZATION_POLICY_BLOB'
          value: authorizationPolicyBlob
        }
        {
          name: 'ALLOWED_ENTITY_SETS'
          value: allowedEntitySets
        }
        {
          name: 'DATAVERSE_SHARED_THROTTLE'
          value: dataverseSharedThrottle
        }
        {
          name: 'DATAVERSE_THROTTLE_REFRESH_SECONDS'
          value: dataverseThrottleRefreshSeconds
        }
        {
          name: 'DATAVERSE_THROTTLE_GROW_AFTER'
          value: dataverseThrottleGrowAfter
        }
        {
          name: 'DATAVERSE_THROTTLE_HEARTBEAT_SECONDS'
          value: dataverseThrottleHeartbeatSeconds
        }
        {
          name: 'AZURE_CLIENT_ID'
          value: identityClientId
        }
        {
          name: 'AzureWebJobsStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'AzureWebJobsStorage__clientId'
          value: identityClientId
        }
        {
          name: 'AzureWebJobsStorage__blobServiceUri'
          value: blobEndpoint
        }
        {
          name: 'AzureWebJobsStorage__queueServiceUri'
          value: queueEndpoint
        }
        {
          name: 'AzureWebJobsStorage__tableServiceUri'
          value: tableEndpoint
        }
        {
          // The Python worker runs sync invocations on min(32, CPUs + 4) threads by default: ~5 on a Flex
          // instance, fewer than host.json's queue concurrency (batchSize 16 + newBatchThreshold 8 = 24).
          // An invocation waiting for a thread has already started functionTimeout's clock but not the
          // job's deadline, which could then outlive it. 24 queue + 8 for HTTP and the timer (docs/design.md).
          name: 'PYTHON_THREADPOOL_THREAD_COUNT'
          value: '32'
        }
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: applicationInsightsConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'Authorization=AAD;ClientId=${identityClientId}'
        }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${blobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

resource appDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'function-logs'
  scope: app
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        category: 'FunctionAppLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output id string = app.id
output name string = app.name
output uri string = 'https://${app.properties.defaultHostName}'
