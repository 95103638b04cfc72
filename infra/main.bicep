// Dataverse S2S on Azure Functions (Flex Consumption): the app, its identity, storage, queues, Key Vault,
// monitoring, and the role assignments between them. Deploy to a resource group, with `azd up` or with
// `az deployment group create --resource-group <rg> --parameters infra/main.bicepparam`.
targetScope = 'resourceGroup'

@minLength(1)
@maxLength(64)
@description('Environment name (azd): feeds the resource name token and the azd-env-name tag.')
param environmentName string

@description('Region of every resource; empty means the resource group\'s. It must offer Flex Consumption.')
param location string = ''

@description('Object id of the user (or principal) deploying, granted data access for local runs and secret management; empty for none.')
param principalId string = ''

@description('Type of principalId: User for a person (azd up), ServicePrincipal for a CI identity.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param principalType string = 'User'

@description('DATAVERSE_URL: the environment URL, e.g. https://contoso.crm4.dynamics.com (Power Platform admin center).')
param dataverseUrl string

@description('DATAVERSE_TENANT_ID: Entra tenant (directory) id of the app registration.')
param dataverseTenantId string

@description('DATAVERSE_CLIENT_ID: application (client) id of the app registration.')
param dataverseClientId string

@description('DATAVERSE_CLIENT_SECRET_NAME: Key Vault secret that holds the client secret.')
param dataverseClientSecretName string = 'dataverse-client-secret'

@allowed([
  'secret'
  'federated'
  'certificate'
])
@description('DATAVERSE_CREDENTIAL: secret (client secret in Key Vault), federated (the managed identity, no secret at all) or certificate (Key Vault certificate).')
param dataverseCredential string = 'secret'

@description('DATAVERSE_CERTIFICATE_NAME: Key Vault certificate used when dataverseCredential is certificate.')
param dataverseCertificateName string = 'dataverse-certificate'

@description('federated only: uniqueName of the app registration, to add its federated credential (trusting the app\'s managed identity) with the Microsoft Graph Bicep extension; needs Application.ReadWrite.All. Empty: run the command in the FEDERATED_CREDENTIAL_COMMAND output (docs/credentials.md).')
param dataverseAppUniqueName string = ''

@description('WEBHOOK_SECRET_NAME: Key Vault secret that holds the webhook signing key.')
param webhookSecretName string = 'webhook-signing-secret'

@description('MESSAGE_SIGNING_SECRET_NAME: Key Vault secret the app signs queue messages with (only the app and operators read it).')
param messageSigningSecretName string = 'queue-message-signing-key'

@description('WEBHOOK_KEY_GRACE_SECONDS: how long a replaced signing key is still accepted after the new one is read.')
param webhookKeyGraceSeconds string = '600'

@description('WEBHOOK_KEY_REFRESH_SECONDS: how often each instance re-reads the signing keys from Key Vault.')
param webhookKeyRefreshSeconds string = '300'

@description('DATAVERSE_API_VERSION: Web API version.')
param dataverseApiVersion string = 'v9.2'

@minLength(3)
@maxLength(52)
@description('SYNC_QUEUE_NAME: queue of sync jobs; <name>-poison and <name>-deadletter are created with it.')
param syncQueueName string = 'dynamics-sync'

@description('RECONCILE_SCHEDULE: NCRONTAB (six fields, seconds first) of the user reconciliation timer.')
param reconcileSchedule string = '0 0 */6 * * *'

@description('DATAVERSE_TIMEOUT_SECONDS: timeout of one Dataverse HTTP request.')
param dataverseTimeoutSeconds string = '30'

@description('DATAVERSE_MAX_RETRIES: retries of one Dataverse request on 429/5xx/timeouts.')
param dataverseMaxRetries string = '5'

@description('DATAVERSE_MAX_RETRY_SECONDS: total time one request may spend waiting to retry.')
param dataverseMaxRetrySeconds string = '300'

@description('JOB_DEADLINE_SECONDS: a job stops waiting (throttling, back-off) at this age and goes back to the queue; with DATAVERSE_TIMEOUT_SECONDS it must stay below host.json\'s functionTimeout (10 min).')
param jobDeadlineSeconds string = '480'

@description('HTTP_MAX_WAIT_SECONDS: the longest /api/users and /api/diagnostics wait on Dataverse throttling before answering 503 with Retry-After.')
param httpMaxWaitSeconds string = '5'

@description('USER_CACHE_TTL_SECONDS: how long a found user stays cached per instance.')
param userCacheTtlSeconds string = '900'

@description('USER_CACHE_NEGATIVE_TTL_SECONDS: how long "no such user" stays cached.')
param userCacheNegativeTtlSeconds string = '60'

@description('AUTHORIZATION_POLICY: the authorization policy as inline JSON; empty for none (docs/authorization.md).')
param authorizationPolicy string = ''

@description('AUTHORIZATION_POLICY_BLOB: <container>/<path> of the policy JSON in the app storage account, re-read every minute; empty for none.')
param authorizationPolicyBlob string = ''

@description('ALLOWED_ENTITY_SETS: entity sets jobs may write when no policy is set (the default policy).')
param allowedEntitySets string = 'contacts,accounts,leads'

@description('DATAVERSE_SHARED_THROTTLE: one Dataverse throttle for all instances through the host storage (auto, true, false). See docs/sizing.md.')
@allowed([
  'auto'
  'true'
  'false'
])
param dataverseSharedThrottle string = 'auto'

@description('DATAVERSE_THROTTLE_REFRESH_SECONDS: how often an instance re-reads the shared throttle blob.')
param dataverseThrottleRefreshSeconds string = '1'

@description('DATAVERSE_THROTTLE_GROW_AFTER: successes in a row that add one concurrency slot back after a 429.')
param dataverseThrottleGrowAfter string = '10'

@description('DATAVERSE_THROTTLE_HEARTBEAT_SECONDS: how often an instance marks itself live in the shared blob.')
param dataverseThrottleHeartbeatSeconds string = '15'

@secure()
@description('Optional: the Dataverse client secret, written to Key Vault when given. `az keyvault secret set` after deployment keeps it out of deployment inputs.')
param dataverseClientSecret string = ''

@secure()
@description('Optional: the webhook signing key, written to Key Vault when given.')
param webhookSigningSecret string = ''

@secure()
@description('Optional: the queue message signing key (random, at least 32 bytes), written to Key Vault when given. Senders never get it.')
param messageSigningSecret string = ''

@description('Deny (default): the vault admits only the app (through its virtual network), Azure trusted services and keyVaultAllowedIpAddresses. Allow: open to every network, still Entra RBAC only, for a first-time setup without virtual network integration.')
@allowed([
  'Deny'
  'Allow'
])
param keyVaultNetworkDefaultAction string = 'Deny'

@description('Public IPv4 addresses or CIDR ranges allowed through the vault firewall (your workstation, to run `az keyvault secret set`).')
param keyVaultAllowedIpAddresses array = []

@description('Public IPv4 addresses or CIDR ranges let through the storage firewall (operators running tools/queuectl.py, uploading the roster). Storage refuses /31 and /32 ranges: a /32 is sent as the bare address, list a /31\'s two addresses. The app reaches storage through its subnet; with keyVaultNetworkDefaultAction Allow there is no subnet and the account accepts every network.')
param storageAllowedIpAddresses array = []

@description('Address space of the app\'s virtual network (created when keyVaultNetworkDefaultAction is Deny).')
param vnetAddressPrefix string = '10.20.0.0/16'

@description('App subnet, delegated to Microsoft.App/environments.')
param appSubnetPrefix string = '10.20.0.0/24'

@description('Memory of one instance (MB).')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Upper bound of instances the app scales out to. 40 (the Flex minimum) per application user: every live instance keeps at least one Dataverse request in flight, and one user may have 52 at once (docs/sizing.md).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Storage replication: geo-redundant by default so pending sync jobs survive a regional outage.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_RAGRS'
  'Standard_GZRS'
  'Standard_RAGZRS'
])
param storageSkuName string = 'Standard_GRS'

var abbrs = loadJsonContent('abbreviations.json')
var resolvedLocation = empty(location) ? resourceGroup().location : location
var resourceToken = toLower(uniqueString(resourceGroup().id, environmentName, resolvedLocation))
var tags = {
  'azd-env-name': environmentName
}
var functionAppName = '${abbrs.webSitesFunctions}${resourceToken}'
var deploymentContainerName = 'app-package-${resourceToken}'
var vnetIntegration = keyVaultNetworkDefaultAction == 'Deny'

module identity 'modules/identity.bicep' = {
  name: 'identity'
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}${resourceToken}'
    location: resolvedLocation
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    applicationInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    location: resolvedLocation
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: resolvedLocation
    tags: tags
    deploymentContainerName: deploymentContainerName
    syncQueueName: syncQueueName
    skuName: storageSkuName
    workspaceId: monitoring.outputs.workspaceId
    appSubnetId: vnetIntegration ? network.outputs.appSubnetId : ''
    allowedIpAddresses: storageAllowedIpAddresses
  }
}

module network 'modules/network.bicep' = if (vnetIntegration) {
  name: 'network'
  params: {
    name: '${abbrs.networkVirtualNetworks}${resourceToken}'
    location: resolvedLocation
    tags: tags
    addressPrefix: vnetAddressPrefix
    appSubnetPrefix: appSubnetPrefix
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: '${abbrs.keyVaultVaults}${resourceToken}'
    location: resolvedLocation
    tags: tags
    networkDefaultAction: keyVaultNetworkDefaultAction
    allowedIpAddresses: keyVaultAllowedIpAddresses
    appSubnetId: vnetIntegration ? network.outputs.appSubnetId : ''
    clientSecretName: dataverseClientSecretName
    webhookSecretName: webhookSecretName
    dataverseClientSecret: dataverseClientSecret
    // The client secret is written only in the secret mode (federated and certificate need none).
    dataverseCredential: dataverseCredential
    webhookSigningSecret: webhookSigningSecret
    messageSecretName: messageSigningSecretName
    messageSigningSecret: messageSigningSecret
    workspaceId: monitoring.outputs.workspaceId
  }
}

module rbac 'modules/rbac.bicep' = {
  name: 'rbac'
  params: {
    identityPrincipalId: identity.outputs.principalId
    deployerPrincipalId: principalId
    deployerPrincipalType: principalType
    dataverseCredential: dataverseCredential
    storageAccountName: storage.outputs.name
    blobContainerNames: storage.outputs.blobContainerNames
    keyVaultName: keyVault.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
  }
}

// federated: the app registration trusts the managed identity (issuer = the tenant's v2.0 issuer,
// subject = the identity's principal id, audience api://AzureADTokenExchange).
module federatedCredential 'graph/federated-credential.bicep' = if ((dataverseCredential == 'federated') && !empty(dataverseAppUniqueName)) {
  name: 'federated-credential'
  params: {
    appUniqueName: dataverseAppUniqueName
    identityPrincipalId: identity.outputs.principalId
  }
}

var federatedIssuer = '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  // The host's first start already finds its storage, vault and telemetry roles in place.
  dependsOn: [
    rbac
  ]
  params: {
    planName: '${abbrs.webServerFarms}${resourceToken}'
    appName: functionAppName
    location: resolvedLocation
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    blobEndpoint: storage.outputs.blobEndpoint
    queueEndpoint: storage.outputs.queueEndpoint
    tableEndpoint: storage.outputs.tableEndpoint
    deploymentContainerName: storage.outputs.deploymentContainerName
    applicationInsightsConnectionString: monitoring.outputs.connectionString
    workspaceId: monitoring.outputs.workspaceId
    appSubnetId: vnetIntegration ? network.outputs.appSubnetId : ''
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    dataverseUrl: dataverseUrl
    dataverseTenantId: dataverseTenantId
    dataverseClientId: dataverseClientId
    keyVaultUrl: keyVault.outputs.uri
    dataverseClientSecretName: dataverseClientSecretName
    dataverseCredential: dataverseCredential
    dataverseCertificateName: dataverseCertificateName
    webhookSecretName: webhookSecretName
    messageSigningSecretName: messageSigningSecretName
    webhookKeyGraceSeconds: webhookKeyGraceSeconds
    webhookKeyRefreshSeconds: webhookKeyRefreshSeconds
    dataverseApiVersion: dataverseApiVersion
    syncQueueName: syncQueueName
    reconcileSchedule: reconcileSchedule
    dataverseTimeoutSeconds: dataverseTimeoutSeconds
    dataverseMaxRetries: dataverseMaxRetries
    dataverseMaxRetrySeconds: dataverseMaxRetrySeconds
    userCacheTtlSeconds: userCacheTtlSeconds
    jobDeadlineSeconds: jobDeadlineSeconds
    httpMaxWaitSeconds: httpMaxWaitSeconds
    userCacheNegativeTtlSeconds: userCacheNegativeTtlSeconds
    authorizationPolicy: authorizationPolicy
    authorizationPolicyBlob: authorizationPolicyBlob
    allowedEntitySets: allowedEntitySets
    dataverseSharedThrottle: dataverseSharedThrottle
    dataverseThrottleRefreshSeconds: dataverseThrottleRefreshSeconds
    dataverseThrottleGrowAfter: dataverseThrottleGrowAfter
    dataverseThrottleHeartbeatSeconds: dataverseThrottleHeartbeatSeconds
  }
}

output AZURE_LOCATION string = resolvedLocation
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_NAME string = functionApp.outputs.name
output SERVICE_API_NAME string = functionApp.outputs.name
output SERVICE_API_URI string = functionApp.outputs.uri
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output KEY_VAULT_URL string = keyVault.outputs.uri
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_STORAGE_BLOB_ENDPOINT string = storage.outputs.blobEndpoint
output AZURE_STORAGE_QUEUE_ENDPOINT string = storage.outputs.queueEndpoint
output SYNC_QUEUE_NAME string = syncQueueName
output AZURE_USER_ASSIGNED_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
output AZURE_USER_ASSIGNED_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
// federated without dataverseAppUniqueName: the one command that adds the federated credential.
output FEDERATED_CREDENTIAL_COMMAND string = ((dataverseCredential == 'federated') && empty(dataverseAppUniqueName)) ? 'az ad app federated-credential create --id ${dataverseClientId} --parameters \'{"name":"function-app-identity","issuer":"${federatedIssuer}","subject":"${identity.outputs.principalId}","audiences":["api://AzureADTokenExchange"]}\'' : ''
