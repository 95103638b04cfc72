// Role assignments, each at the narrowest scope that works. The app's identity gets what the Functions
// host and the code need; the optional deploying user gets what running locally against these resources
// and putting secrets into the vault need. Names are guid(scope, principal, role): stable across re-runs.

param identityPrincipalId string

@description('Object id of a user to grant data access for local development and secret management; empty for none.')
param deployerPrincipalId string = ''

@description('User for a person; ServicePrincipal when a CI identity deploys.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param deployerPrincipalType string = 'User'

@description('DATAVERSE_CREDENTIAL: certificate also lets the deployer create and import the Key Vault certificate.')
@allowed([
  'secret'
  'federated'
  'certificate'
])
param dataverseCredential string = 'secret'

param storageAccountName string

@description('The blob containers the app identity may use (storage.bicep output blobContainerNames); Blob Data Owner is granted on each, never on the account.')
param blobContainerNames array
param keyVaultName string
param applicationInsightsName string

var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'
var keyVaultSecretsOfficer = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
var keyVaultCertificatesOfficer = 'a4417e6f-fecd-4de8-b567-7b0420556985'
var storageBlobDataOwner = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
var storageQueueDataContributor = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
var storageTableDataContributor = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
var monitoringMetricsPublisher = '3913510d-42f4-4e42-8a64-420c390055eb'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource containers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = [for containerName in blobContainerNames: {
  parent: blobService
  name: containerName
}]

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

// The app: read its two secrets.
resource appKeyVaultSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, identityPrincipalId, keyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Per container, not on the account: the deployment package, the host's leases and keys, the app's
// reconciliation, replay and throttle blobs. Any other container in the account stays out of reach.
resource appStorageBlobDataOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for i in range(0, length(blobContainerNames)): {
  name: guid(containers[i].id, identityPrincipalId, storageBlobDataOwner)
  scope: containers[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataOwner)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

// The queue trigger (read, delete, move to -poison) and the queue outputs (sync, -deadletter).
resource appStorageQueueDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identityPrincipalId, storageQueueDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributor)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// The host's diagnostic events table.
resource appStorageTableDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identityPrincipalId, storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributor)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Telemetry to an Application Insights component that accepts Entra-authenticated ingestion only.
resource appMonitoringMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, identityPrincipalId, monitoringMetricsPublisher)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisher)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// The deploying user: set and rotate the secrets (an RBAC vault gives Owners no data access by itself).
resource deployerKeyVaultSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(vault.id, deployerPrincipalId, keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsOfficer)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

// certificate mode: the deploying user creates or imports the certificate (`az keyvault certificate
// create/import`, docs/credentials.md), which Secrets Officer does not allow.
resource deployerKeyVaultCertificatesOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if ((dataverseCredential == 'certificate') && !empty(deployerPrincipalId)) {
  name: guid(vault.id, deployerPrincipalId, keyVaultCertificatesOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultCertificatesOfficer)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

// The deploying user: upload the roster, read reconciliation reports.
resource deployerStorageBlobDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(storage.id, deployerPrincipalId, storageBlobDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

// The deploying user: peek, replay and send with tools/queuectl.py.
resource deployerStorageQueueDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(storage.id, deployerPrincipalId, storageQueueDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributor)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}
